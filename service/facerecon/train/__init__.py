"""Training of the networks the default install ships: the R-Net (weakly supervised, hybrid loss + synthetic
supervision), the C-Net (image sets, R-Net frozen), the skin GMM, and their export for serving.

Modules: :mod:`~facerecon.train.data` (real-photo preprocessing cache, synthetic photos, augmentation),
:mod:`~facerecon.train.loop` (training loops, checkpoints, logs), :mod:`~facerecon.train.skin_gmm` (EM skin / non-skin
mixtures), :mod:`~facerecon.train.evaluate` (landmark and coefficient-recovery figures), :mod:`~facerecon.train.export`
(``export-onnx``). The command line is :mod:`facerecon.train_cli`. Nothing here is imported by the serving path.
"""
