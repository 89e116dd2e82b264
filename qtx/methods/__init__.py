"""The papers' methods that transform a trained model or drive its calibration.

* :mod:`qtx.methods.outlier_suppression`: gamma migration and token-wise clipping (Wei et
  al., NeurIPS 2022), and the post-training quantization methods they are compared with.
"""
