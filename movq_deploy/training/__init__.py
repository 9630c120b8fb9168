"""Training (torch; imported only by the training scripts, never by the runtime).

    common.py      distributed set-up, resume files, metrics log, learning-rate schedule, PSNR
    data.py        training images: a folder of class sub-folders, or the embedded photographs; crops
    perceptual.py  the LPIPS perceptual loss over local VGG16 weights
    tokenizer.py   stage 1: the MoVQ tokenizer
    prior.py       stage 2: the MaskGIT prior on the frozen tokenizer's indices

The command lines are train/tokenizer.py and train/prior.py.
"""
