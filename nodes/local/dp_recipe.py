"""The DP recipe the demo runs: public pretraining, then private fine-tuning (issue 14).

The scientist pretrains the plan's network on "public" phantoms from another scanner (finer voxels,
other calibration; in the notebook process, :func:`voxgrid.pretrain`), and the federation fine-tunes
those weights with and without DP-SGD. DP-SGD is stated as a privacy target (the nodes derive the
noise), with group norm, K augmented views per patient and a large expected batch.
"""

from __future__ import annotations

from voxgrid.datasets import make_phantom
from voxgrid.datasets.phantoms import SiteSpec

#: The public set's scanner: finer voxels and another calibration than any site's.
PUBLIC_SCANNER = dict(hu_offset=-40.0, hu_scale=0.9, noise_sd=25.0, spacing=(1.2, 1.2, 1.6))
PUBLIC_LABELS = {1: "pancreas", 2: "tumor"}


def recipe_plan(labels: list[str], size: int, local_epochs: int):
    """A small group-norm UNet (one group: the classes' channel count need not divide), intensity jitter so
    a patient's K views differ, Adam at 3e-3."""
    import voxgrid

    augmentation = [{"_target_": "RandScaleIntensityd", "keys": ["image"], "factors": 0.1, "prob": 0.5},
                    {"_target_": "RandShiftIntensityd", "keys": ["image"], "offsets": 0.05, "prob": 0.5}]
    patch = min(size, 32)
    return voxgrid.unet_plan(labels, patch_size=(patch,) * 3, channels=(8, 16, 32), strides=(2, 2), num_res_units=1,
                             norm="group", norm_groups=1, lr=3e-3, local_epochs=local_epochs,
                             augmentation=augmentation, name="demo")


def dp_plan(plan, rounds: int, epsilon: float | None, noise: float | None, clip: float = 1.0, multiplicity: int = 4):
    """``plan`` with patient-level DP-SGD: a target ``epsilon`` over ``rounds`` (the nodes derive the noise),
    or a given ``noise`` multiplier; Poisson rate 0.5, K = ``multiplicity`` views per patient, one epoch."""
    import voxgrid

    dp = {"mechanism": "dp_sgd", "max_grad_norm": clip, "delta": 1e-5, "sample_rate": 0.5,
          "augmentation_multiplicity": multiplicity}
    dp |= {"target_epsilon": epsilon, "rounds": rounds} if noise is None else {"noise_multiplier": noise}
    return voxgrid.Plan(**{**plan.model_dump(mode="json"), "privacy": dp, "local_epochs": 1, "name": "demo-dp"})


def public_weights(plan, size: int, seed: int, volumes: int = 16, epochs: int = 10, echo=print):
    """Pretrain ``plan`` on ``volumes`` public phantoms (the scientist's own data: no node, no budget)."""
    import voxgrid

    site = SiteSpec(name="public", n_volumes=volumes, labels=dict(PUBLIC_LABELS), shape=(size,) * 3, tumor=True,
                    seed=seed * 1009 + 55, **PUBLIC_SCANNER)
    echo(f"[demo] pretraining the plan's network here, on {volumes} public phantoms from another scanner "
         f"({PUBLIC_SCANNER}), {epochs} epochs")
    return voxgrid.pretrain(plan, [make_phantom(site, i) for i in range(volumes)], epochs=epochs, seed=seed,
                            label_names=PUBLIC_LABELS)


def three_rows(plan, initial, dp, plain, pointers, seed: int):
    """The cross-site table of public only, DP-FL and non-private FL (each final global model)."""
    import voxgrid

    models = [voxgrid.SelectedModel("public only", initial, plan, "public", 0)]
    if dp is not None:
        models.append(voxgrid.SelectedModel("DP-FL", dp.global_weights, dp.plan, dp.experiment_id, len(dp.history) - 1))
    models.append(voxgrid.SelectedModel("no DP", plain.global_weights, plain.plan, plain.experiment_id,
                                        len(plain.history) - 1))
    return voxgrid.cross_site_evaluation(models, pointers, seed=seed)
