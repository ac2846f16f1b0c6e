"""The commands beside `fit`: `sample`, `evaluate`, `export` and `data optimize`, each a function whose typed
arguments are its command line. May import every folder below it; only `cli.py` imports them."""
