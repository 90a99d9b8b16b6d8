"""Fine-tuning: the fused model with unfrozen backbones, trained end to end.

Beside fuse (backbones -> **finetuning** -> records -> reporting). ``model`` builds the
network and its unfreeze policies, ``loop`` trains an epoch, ``run`` drives the phases,
checkpoints and early stopping. Hands run folders to records.
"""
