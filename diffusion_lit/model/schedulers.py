"""Our processes as diffusers' schedulers and back: the scheduler a model exports with (`scheduler_for`), and the
process and prediction a pipeline's scheduler config says (`process_of`, `vp_of`), for export, `InitFrom` and Stable
Diffusion."""

import torch

from diffusion_lit.core.errors import UserError
from diffusion_lit.core.optional import need
from diffusion_lit.model.process import VP
from diffusion_lit.model.schedule import cosine_betas, linear_betas, scaled_linear_betas

PREDICTION_TYPES = {"eps": "epsilon", "v": "v_prediction", "x0": "sample"}  # ours -> diffusers' prediction_type


def scheduler_for(module):
    """The diffusers scheduler of a model's process and prediction, with the same betas as ours (checked), or a
    UserError for what diffusers' schedulers cannot express."""
    diffusers = need("diffusers")
    schedule, prediction, kind = module.process, module.objective.prediction, module.process.spec()["process"]
    if kind not in ("vp", "flow"):
        raise UserError(f"a {type(schedule).__name__} process has no diffusers scheduler: export writes VP and flow "
                        "models only")
    if kind == "flow":
        if prediction != "v":
            raise UserError(f"a flow model predicting {prediction} has no diffusers scheduler (FlowMatch schedulers "
                            "take the velocity): only v-prediction flow models export")
        return diffusers.FlowMatchEulerDiscreteScheduler(num_train_timesteps=schedule.timesteps, shift=schedule.shift)
    # diffusers' linear betas are a float32 linspace, ours a float64 one rounded to float32: a last bit apart at
    # some t. Written out as trained_betas they are ours exactly (beta_schedule then only names them).
    betas = {"linear": {"beta_schedule": "linear", "beta_start": 1e-4, "beta_end": 0.02,
                        "trained_betas": schedule.betas.cpu().tolist()},
             "cosine": {"beta_schedule": "squaredcos_cap_v2"},
             "scaled_linear": {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012,
                               "trained_betas": schedule.betas.cpu().tolist()}}[schedule.kind]
    # DDIM on `trailing` timesteps is our `--spacing trailing`; the last step lands on x0 (set_alpha_to_one).
    scheduler = diffusers.DDPMScheduler(num_train_timesteps=schedule.timesteps, prediction_type=PREDICTION_TYPES[
        prediction], clip_sample=True, clip_sample_range=1.0, variance_type="fixed_small", timestep_spacing="trailing",
        **betas)
    if not torch.equal(scheduler.betas.float(), schedule.betas.cpu()):
        gap = (scheduler.betas.float() - schedule.betas.cpu()).abs().max().item()
        raise UserError(f"diffusers' {betas['beta_schedule']} betas differ from this model's by up to {gap:.2g}: "
                        "no exact scheduler for it, so nothing was exported")
    return scheduler


def process_of(scheduler_config: dict) -> dict:
    """What a diffusers scheduler config says of the process: our `process`, `schedule`, `timesteps` and
    `prediction` (a UserError for one we cannot train)."""
    name = scheduler_config.get("_class_name", "")
    if name.startswith("FlowMatch"):
        return {"process": "flow", "prediction": "v"}
    if scheduler_config.get("rescale_betas_zero_snr"):
        raise UserError("the scheduler rescales its betas to zero terminal SNR (rescale_betas_zero_snr), a schedule "
                        "diffusion_lit does not train with")
    kinds = {"linear": "linear", "squaredcos_cap_v2": "cosine", "scaled_linear": "scaled_linear"}
    ends = {"linear": (1e-4, 0.02), "scaled_linear": (0.00085, 0.012)}  # the (beta_start, beta_end) we train with
    kind = scheduler_config.get("beta_schedule", "linear")
    if scheduler_config.get("trained_betas") is not None:  # which of our schedules they are, if any
        given = torch.tensor(scheduler_config["trained_betas"], dtype=torch.float64)
        timesteps = len(given)
        kind = next((name for name, ours in (("linear", linear_betas(timesteps)),
                                             ("squaredcos_cap_v2", cosine_betas(timesteps)),
                                             ("scaled_linear", scaled_linear_betas(timesteps)))
                     if torch.allclose(given, ours, rtol=1e-6, atol=0)), "trained_betas")
    elif kind in ends and (scheduler_config.get("beta_start", 1e-4 if kind == "linear" else None),
                           scheduler_config.get("beta_end", 0.02 if kind == "linear" else None)) != ends[kind]:
        kind = f"{kind} from {scheduler_config.get('beta_start')} to {scheduler_config.get('beta_end')}"
    if kind not in kinds:
        raise UserError(f"the scheduler's betas ({kind}) are not a schedule diffusion_lit trains with (DDPM's linear "
                        "1e-4 to 0.02, cosine, or Stable Diffusion's scaled_linear 0.00085 to 0.012)")
    prediction = {v: k for k, v in PREDICTION_TYPES.items()}.get(scheduler_config.get("prediction_type", "epsilon"))
    if prediction is None:
        raise UserError(f"prediction_type {scheduler_config.get('prediction_type')!r} is not one of ours "
                        f"({', '.join(PREDICTION_TYPES.values())})")
    timesteps = (len(scheduler_config["trained_betas"]) if scheduler_config.get("trained_betas") is not None
                 else scheduler_config.get("num_train_timesteps", 1000))
    return {"process": "vp", "schedule": kinds[kind], "timesteps": timesteps, "prediction": prediction}


def vp_of(scheduler_config: dict, what: str) -> tuple[VP, str]:
    """(the VP process, the prediction) of a pipeline's scheduler config; a UserError naming `what` for a
    flow-matching one."""
    found = process_of(scheduler_config)
    if found["process"] != "vp":
        raise UserError(f"{what}: a flow-matching scheduler; SD 1.x / 2.x's are VP schedulers")
    return VP(found["schedule"], found["timesteps"]), found["prediction"]
