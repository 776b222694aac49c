"""nnU-Net trainers for every registered headzoo head, for ``export nnUNet_extTrainer=$(headzoo nnunet-dir)``.

nnU-Net's trainer discovery imports this module and looks up ``nnUNetTrainer_<head>`` (and ``_1epoch``,
``_5epochs``, ``_smoke``) here. The heads are read from the ``headzoo.heads`` entry points at import time,
so a plug-in head installed later has its trainers without regenerating anything.
"""

from headzoo.nnunet.trainer import trainers_for_registered_heads

globals().update(trainers_for_registered_heads())
