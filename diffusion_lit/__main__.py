from diffusion_lit.cli import main

main()
