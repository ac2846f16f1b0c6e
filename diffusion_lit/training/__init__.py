"""What runs beside `fit`, as Lightning callbacks and helpers: sample grids, FID and the guide's checkpoints
(`callbacks`), last.ckpt on signals and the run lock (`checkpointing`), starting from another model's weights
(`init_from`), fast paths and CPU cost (`speed`), and FID's plumbing (`metrics`). May import every folder below it,
`io` included."""
