"""The defaults of a training job that front ends show before anything loads.

Kept apart from training/job.py, which imports torch: the app's Train form and the CLI's help
read them at once.
"""

# The peak learning rate; every job decays it to zero over its steps (`job.scheduled_lr`).
DEFAULT_LR = {"pac": 1e-3, "lora": 8e-4, "full": 2e-5}
# Chosen on the household fixture (docs/training.md): enough passes for 20 facts to stick.
DEFAULT_EPOCHS = {"pac": 25, "lora": 25, "full": 3}
# How the frozen backbone may be loaded (training/quant.py); `--quant` of `hearth train`.
QUANT_MODES = ("none", "nf4", "int8")
