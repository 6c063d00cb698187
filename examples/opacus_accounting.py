"""Accounting for a PyTorch / Opacus training run with patchdp's accountant (numbers only,
no torch needed).

Opacus trains with Poisson sampling (``sample_rate`` q = expected batch / N), clips each
per-example gradient to ``max_grad_norm`` C and adds N(0, (σ·C)²) to the sum: σ is
patchdp's noise multiplier z. Its accountants report add/remove DP. This script gives,
for the same run:

- add/remove ε (the Opacus convention; comparable to Opacus' PRV accountant),
- image-level substitution ε (one image replaced: sensitivity 2C),
- patch-level ε: substitution of one patch, amplified by the random crops.

The patch-level number holds only if the run's crops are drawn as the CropSpec says:
torchvision's ``RandomCrop(size, padding=P)`` draws the offset uniformly over the
zero-padded image, which is ``CropSpec(size, padding=P)`` (K = 1 crop per example); the
model must see nothing of the image but the crop, and Opacus must run in
``secure_mode=True`` (a secret seed for sampling, crops and noise).

    python examples/opacus_accounting.py [--quick] [--noise-multiplier 1.1] [--epochs 20] ...
"""
import argparse

import patchdp


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset-size", type=int, default=50_000, help="N (CIFAR-10: 50000)")
    parser.add_argument("--batch-size", type=int, default=256, help="expected batch size q·N")
    parser.add_argument("--noise-multiplier", type=float, default=1.1, help="Opacus' noise_multiplier σ")
    parser.add_argument("--epochs", type=float, default=20)
    parser.add_argument("--delta", type=float, default=1e-5)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--crop", type=int, default=32, help="RandomCrop size")
    parser.add_argument("--padding", type=int, default=4, help="RandomCrop padding")
    parser.add_argument("--patch", type=int, default=4, help="side of the protected square patch")
    parser.add_argument("--quick", action="store_true", help="1 epoch at a coarse grid (seconds)")
    args = parser.parse_args(argv)
    epochs, resolution = (1, 1e-2) if args.quick else (args.epochs, 1e-3)

    sampling = patchdp.PoissonSampling(rate=args.batch_size / args.dataset_size, dataset_size=args.dataset_size)
    steps = sampling.steps_for_epochs(epochs)  # Opacus: len(data_loader) · epochs
    run = patchdp.DPSGD(sampling=sampling, clip_norm=1.0, noise_multiplier=args.noise_multiplier, delta=args.delta,
                        crop=patchdp.CropSpec(args.crop, padding=args.padding),
                        image_shape=(args.image_size, args.image_size), patch=patchdp.Patch.rectangle(args.patch),
                        resolution=resolution)  # ε does not depend on C: z is in units of it
    p_star = run.inclusion_probability
    accountings = [("add/remove (Opacus convention)", "add_remove"), ("image-level substitution", "image"),
                   (f"patch-level, {args.patch}x{args.patch} patch (p* = {p_star:.4f})", "patch")]
    print(f"Poisson sampling q = {sampling.rate:.4g}, {steps} steps, σ = z = {args.noise_multiplier}, "
          f"δ = {args.delta:g}")
    for name, accounting in accountings:
        print(f"  ε {name:<45} {run.replace(accounting=accounting).epsilon(steps):8.3f}")
    if p_star == 1:
        print("  p* = 1: every crop position touches the patch, so cropping gives no amplification here; "
              "smaller crops (or more padding) would.")


if __name__ == "__main__":
    main()
