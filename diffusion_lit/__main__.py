"""`python -m diffusion_lit`: the command line (`diffusion_lit.cli`)."""

import sys

try:
    from diffusion_lit.cli import main
except KeyboardInterrupt:  # Ctrl-C while torch and Lightning import: nothing has started, nothing to keep
    print("stopped by SIGINT while starting: nothing was written", file=sys.stderr)
    sys.exit(130)

main()
