"""Drawing images from a trained model: the samplers (`samplers`: one class each, in one table, every model call
written out), the ODE solvers and their grids (`solvers`), and the sampling settings that `sample`, `evaluate` and
the callbacks share (`settings`). May import `core`, `nets`, `data` and `model`."""
