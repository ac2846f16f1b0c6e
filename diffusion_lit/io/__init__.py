"""Models in and out: a checkpoint read back into a model (`loading`: the trust rule, old settings upgraded, a guide
checked), a checkpoint as a few-step student's teacher (`teacher`) and the exchange with diffusers (`diffusers_io`:
the UNet as UNet2DModel and back). May import every folder below it: `core`, `nets`, `data`, `model`, `sampling`."""
