"""The tools built on the core: ``convert`` (checkpoints to model folders), ``heal``, ``finetune``, ``data``,
``bench`` and ``memory`` (measurements), ``study``, ``demo``, ``example``, ``loading`` (model folders),
``run`` (timm's scripts with the momentum models) and ``cli`` (the ``timm-momentum`` command, from
``timm_momentum_cli``, which imports none of this so that ``--help`` stays quick). Submodules are imported on use."""
