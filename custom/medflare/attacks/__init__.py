"""Attacks on released updates, to measure what a site's update reveals about its patients.

This package sits apart from the privacy mechanisms (:mod:`medflare.privacy`) and has no NVFlare
in it: plain torch and numpy, on the tensors' device (a site's GPU when it has one). It is the
attacker's side of ``medflare audit``; nothing here is ever part of a training run.

* :mod:`~medflare.attacks.image_scores`: SSIM, PSNR, the prior baseline (the mean image of the
  other cases) and re-identification among the site's cases;
* :mod:`~medflare.attacks.gradient_matching`: the observed update as a gradient, the mask of
  released entries, the cosine matching loss and the total-variation prior;
* :mod:`~medflare.attacks.inverting_gradients`: the inverting-gradients reconstruction of
  Geiping et al. (2020);
* :mod:`~medflare.attacks.label_inference`: which labels a batch held, from the sign of the
  output layer's update (iDLG, Zhao et al. 2020; Wainakh et al. 2022).

Threat model. An honest-but-curious server (or anyone who reads the update on the wire) that
follows the protocol and knows what the protocol gives it: the architecture, the weights it
sent, the update that came back, the local learning rate and number of steps, the input shape;
the reconstruction attack is also given the true labels (the label attack shows they are
usually recoverable). It does not tamper with the model it sends (no malicious "trap" weights),
does not see other rounds, and knows nothing of the patients beyond what the update carries. A
measured attack is a lower bound on what a stronger attacker can learn, never an upper one.
"""
