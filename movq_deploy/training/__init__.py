"""Training (torch; imported only by the training scripts, never by the runtime).

    common.py      distributed set-up, the step loop (learning-rate schedule, progress bar, log windows, when to
                   evaluate and save), resume files (random state included), metrics log, PSNR
    data.py        training images: a folder of class sub-folders, or the embedded photographs; crops
    losses.py      the PatchGAN discriminator, its hinge loss and VQGAN's adaptive weight
    perceptual.py  the LPIPS perceptual loss over local VGG16 weights
    tokenizer.py   stage 1: the MoVQ tokenizer
    prior.py       stage 2: the MaskGIT prior on the frozen tokenizer's indices

The command lines are train/tokenizer.py and train/prior.py.
"""
