"""Stage 1: train the MoVQ tokenizer (the recipe: movq_deploy/training/tokenizer.py).

    python train/tokenizer.py --config tiny --out runs/tiny [--data DIR] [--steps N] [--resume]
    torchrun --nproc_per_node 2 train/tokenizer.py ...        # DDP: gloo on CPU, nccl on GPU
"""
from movq_deploy.training.tokenizer import main

if __name__ == "__main__":
    main()
