"""Stage 2: train the MaskGIT prior on the frozen tokenizer's indices (the recipe: movq_deploy/training/prior.py).

    python train/prior.py --ckpt runs/tiny/ckpt.pt [--config tiny] [--data DIR] [--steps N] [--resume]
    torchrun --nproc_per_node 2 train/prior.py ...            # DDP: gloo on CPU, nccl on GPU
"""
from movq_deploy.training.prior import main

if __name__ == "__main__":
    main()
