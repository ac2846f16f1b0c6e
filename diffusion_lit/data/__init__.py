"""Images in [-1, 1] for training: the data module (`datamodule.DiffusionDataModule`), its sources (the shipped
digits, MNIST, CIFAR-10, folders, Hugging Face datasets, litdata's streamed chunks), resumable loaders, the digit
judge, and reading and writing images. May import `core` and `nets` (nothing of the model: a source knows no
network)."""
