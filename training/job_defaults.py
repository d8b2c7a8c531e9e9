"""The defaults of a training job that front ends show before anything loads, and how they read
a saved job's sources.

Kept apart from training/job.py, which imports torch: the app's Train form and the CLI's help
read them at once.
"""

# The peak learning rate; every job decays it to zero over its steps (`job.scheduled_lr`).
DEFAULT_LR = {"pac": 1e-3, "lora": 8e-4, "full": 2e-5}
# Chosen on the household fixture (docs/training.md): enough passes for 20 facts to stick.
DEFAULT_EPOCHS = {"pac": 25, "lora": 25, "full": 3}
# How the frozen backbone may be loaded (training/quant.py); `--quant` of `hearth train`.
QUANT_MODES = ("none", "nf4", "int8")


def spec_sources(spec: dict) -> list[str]:
    """The data paths of a saved `JobSpec` (a checkpoint's or a model manifest's). Specs written
    before a job could learn from several sources hold one path as a string."""
    data = spec.get("data")
    if isinstance(data, str):
        return [data]
    if isinstance(data, list) and all(isinstance(p, str) for p in data):
        return data
    raise ValueError(f"field 'data' must be a path or a list of paths (got {data!r})")
