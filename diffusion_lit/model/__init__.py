"""The LightningModule and the parts a config names: the noise process (`process`, `schedule`), what the network
predicts and how the loss is weighted (`targets`, `objective`), conditioning, the latent space and its autoencoder,
guidance, a student's teacher (its interface), the module itself (`module.DiffusionModule`), Stable Diffusion as a
preset of parts, and the upgrade of old checkpoints' settings (`old_model`). May import `core`, `nets` and `data`."""
