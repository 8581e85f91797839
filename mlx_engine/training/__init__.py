"""Training a DFlash drafter for a given target (self-distillation), in torch.

One concept per module: `data` (corpus, held-out split, token cache; torch-free so the bench
can use the split), `objective` (anchors, blocks, decay-weighted CE), `loop` (optimiser,
checkpoints, logs), `evaluate` (acceptance length tau) and `export` (z-lab checkpoint).
"""
