"""The tools built on the core: ``convert`` (checkpoints to model folders), ``heal``, ``finetune``, ``data``,
``bench`` and ``memory`` (measurements), ``study``, ``demo``, ``example``, ``loading`` (model folders),
``run`` (timm's scripts with the momentum models) and ``cli`` (the ``timm-momentum`` command).
Submodules are imported on use, so ``timm-momentum --help`` stays quick."""
