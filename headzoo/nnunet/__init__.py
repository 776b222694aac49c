"""Every headzoo head inside nnU-Net's own training and prediction.

``trainer``: nnU-Net trainers ``nnUNetTrainer_<head>`` (and ``_1epoch``, ``_5epochs``, ``_smoke``) for every
registered head, discovered by nnU-Net through ``nnUNet_extTrainer`` (the folder ``headzoo nnunet-dir`` prints).
``train``: nnU-Net's own ``run_training`` with the trainer class resolved directly (``headzoo nnunet-train``).
``predictor``: nnU-Net's predictor aggregating the head's K output channels instead of C logits
(``headzoo predict``, and the validation at the end of training).
"""
