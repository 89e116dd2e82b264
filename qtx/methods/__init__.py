"""The papers' methods that transform a trained model or drive its calibration or training.

Each paper is a package that defines its methods as records of the kinds in
:mod:`qtx.methods.kinds`:

* a post-training calibration method (``PTQMethod``: the activation estimator it gives a
  setup's rules, and ``calibrate`` yielding calibrated candidates);
* a reparametrisation (``Reparametrisation``: ``(config, variables) -> (config, variables)``,
  recorded in the model config so it is never applied twice);
* a QAT initialisation (``QATInit``) and a QAT term (``QATTerm``: step hooks and the state
  they keep).

:mod:`qtx.methods.registry` holds one name -> method table per kind; the drivers look methods
up there by the names a config gives. Papers:

* :mod:`qtx.methods.outlier_suppression`: gamma migration and token-wise clipping (Wei et
  al., NeurIPS 2022), and the post-training quantization methods they are compared with;
* :mod:`qtx.methods.quant_variation`: Quantization Variation (Huang et al., TMLR 2024): OBR,
  oscillation tracking and the variation analysis.
"""
