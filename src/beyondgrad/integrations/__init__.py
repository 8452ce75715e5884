"""Attach the Cockpit (and beyondgrad's optimizers) to the trainers people use, one line each.

- :mod:`beyondgrad.integrations.lightning`: ``CockpitCallback`` for PyTorch Lightning
  (``lightning`` or ``pytorch_lightning``); a beyondgrad optimizer returned by
  ``configure_optimizers`` gets its forward pass recorded too.
- :mod:`beyondgrad.integrations.huggingface`: ``CockpitCallback`` for the Hugging Face
  ``transformers`` ``Trainer`` (``Trainer(optimizers=(bg_optimizer, None))`` works as well).

Neither module is imported by ``import beyondgrad``: each needs its framework installed.
Shared by both: :mod:`beyondgrad.integrations.base` (the constructor, building the Cockpit
for the trainer's model) and :mod:`beyondgrad.integrations.tracking` (the step's open
contexts, the loss module found in the model).
"""

__all__: list[str] = []
