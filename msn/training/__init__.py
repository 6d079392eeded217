"""How MSN trains, in one room: the input noise (``noise``), the collator that pads a batch and noises it
(``collator``), the two optional losses on top of the paper's (``predicted_noise``: the noise refilled with the
model's own guesses; ``noise_loss``: the predictions made at noised inputs weighted more), the denoising
accuracy every evaluation reports (``denoise``) and the Trainer glue behind ``msn train`` (``train``).

It stands on the shared floor (``msn.data``, ``msn.models``, ``msn.errors``, ``msn.outputs``, ``msn.flags``);
nothing here imports decoding, bench, eval or serve. Import names from their modules (``from msn.training.noise import NoiseConfig``);
the most used ones are also top-level names (``msn.NoiseConfig``, ``msn.MSNCollator``).

The old paths ``msn.noise``, ``msn.noise_loss``, ``msn.predicted_noise``, ``msn.train`` and
``msn.eval.denoise`` still import for one release, with a ``DeprecationWarning``.
"""
