"""Fine-tuning: the fused model with unfrozen backbones, trained end to end.

Stage 6 of 8 (fuse -> **finetuning** -> reporting). ``model`` builds the network and its
unfreeze policies, ``loop`` trains an epoch, ``run`` drives the phases, checkpoints and early
stopping, ``saved`` rebuilds a fine-tuned run. Writes run folders through runs.
"""
