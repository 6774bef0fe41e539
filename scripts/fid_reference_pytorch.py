r"""Reference numbers from pytorch-fid itself, for tests/test_fid.py (torch side; not a
driftlab dependency: run it in a separate venv).

    python3 -m venv /tmp/torchvenv
    /tmp/torchvenv/bin/pip install torch==2.13.0 torchvision==0.28.0 pytorch-fid==0.3.0 \
        numpy scipy pillow
    /tmp/torchvenv/bin/python scripts/fid_reference_pytorch.py fid        # ~3 min, 2 cores
    /tmp/torchvenv/bin/python scripts/fid_reference_pytorch.py fixtures   # seconds

`fid`: FID between MNIST train[:500] and test[:500] (grayscale PNGs, which pytorch-fid
opens with PIL `.convert('RGB')`) computed by pytorch-fid's own command line
(`python -m pytorch_fid DIR1 DIR2`: `get_activations` with ToTensor, bilinear resize to
299 with align_corners=False, `2x - 1`, then `calculate_frechet_distance`). pytorch-fid
loads its weights from the torch hub cache; offline, this script writes that file from the
shared npz (the same tensors as pytorch-fid's release .pth, names mapped by
`models/inception_pth.py`, loaded with pytorch-fid's strict `load_state_dict`). The only
difference from the release file is the 1008-way `fc` layer, which the npz lacks: it is
zero-filled here and unused by the 2048-d pool features. Writes tests/data/fid_reference.json.

`fixtures`: small files for tests that must run without torch: torch-saved checkpoints in
both formats with their expected arrays, pytorch-fid's state-dict names and shapes,
torch's bilinear interpolate on a few images (sampled pixels plus all border pixels), and
pytorch-fid's `get_activations` for MNIST train[:4] (a fast end-to-end check).

The torchvision wheel on this machine's package index is a CUDA build whose C extension
cannot load against CPU torch; pytorch-fid needs only torchvision's Python model code, so
the two custom-op schemas torchvision's import registers fake kernels for are declared
first when (and only when) a plain `import torchvision` fails.
"""

import argparse
import contextlib
import datetime
import gzip
import hashlib
import importlib.util
import io
import json
import os
import platform
import subprocess
import sys
import tempfile

import numpy as np
import PIL
import scipy
import torch
import torch.nn.functional as F
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(os.path.dirname(ROOT), "shared", "data")
NPZ = os.path.join(SHARED, "inception", "fid_inception_v3_2015-12-05_fp32.npz")
OUT = os.path.join(ROOT, "tests", "data")
N_IMAGES = 500


def import_pytorch_fid():
    """pytorch-fid's modules, working around the CUDA-only torchvision extension."""
    ok = subprocess.run([sys.executable, "-c", "import torchvision"], capture_output=True)
    if ok.returncode != 0:
        lib = torch.library.Library("torchvision", "DEF")  # noqa: F841 (kept alive below)
        lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        import_pytorch_fid.lib = lib
    import pytorch_fid
    import pytorch_fid.fid_score
    import pytorch_fid.inception
    import torchvision

    return pytorch_fid, torchvision


def load_mapping():
    """models/inception_pth.py without importing the jax-based models package."""
    sys.path.insert(0, ROOT)  # for core.errors
    spec = importlib.util.spec_from_file_location(
        "inception_pth", os.path.join(ROOT, "models", "inception_pth.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def read_idx(path: str) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        b = f.read()
    shape = [int.from_bytes(b[4 + 4 * i : 8 + 4 * i], "big") for i in range(b[3])]
    return np.frombuffer(b, np.uint8, offset=4 + 4 * b[3]).reshape(shape)


def fid_network(pfi):
    """pytorch-fid's FID Inception module tree (its `fid_inception_v3` minus the download)."""
    net = pfi._inception_v3(num_classes=1008, aux_logits=False, weights=None)
    blocks = {
        "Mixed_5b": pfi.FIDInceptionA(192, pool_features=32),
        "Mixed_5c": pfi.FIDInceptionA(256, pool_features=64),
        "Mixed_5d": pfi.FIDInceptionA(288, pool_features=64),
        "Mixed_6b": pfi.FIDInceptionC(768, channels_7x7=128),
        "Mixed_6c": pfi.FIDInceptionC(768, channels_7x7=160),
        "Mixed_6d": pfi.FIDInceptionC(768, channels_7x7=160),
        "Mixed_6e": pfi.FIDInceptionC(768, channels_7x7=192),
        "Mixed_7b": pfi.FIDInceptionE_1(1280),
        "Mixed_7c": pfi.FIDInceptionE_2(2048),
    }
    for name, block in blocks.items():
        setattr(net, name, block)
    return net


def pytorch_fid_state(pfi, mapping) -> dict:
    """The npz's tensors under pytorch-fid's names (BN scale 1, fc zero: absent in npz)."""
    arrays = np.load(NPZ)
    template = fid_network(pfi).state_dict()
    state = {}
    for name, value in template.items():
        target = mapping.npz_name(name)
        if name.endswith("bn.weight"):
            state[name] = torch.ones_like(value)
        elif target is None or target.startswith("net.fc."):
            state[name] = torch.zeros_like(value)
        else:
            state[name] = torch.from_numpy(arrays[target].copy())
    used = {mapping.npz_name(n) for n in template} - {None}
    assert set(arrays.files) <= used, sorted(set(arrays.files) - used)[:5]
    fid_network(pfi).load_state_dict(state)  # strict: names and shapes must all agree
    return state


def write_pngs(images: np.ndarray, folder: str) -> None:
    os.makedirs(folder)
    for i, img in enumerate(images):
        Image.fromarray(img).save(os.path.join(folder, f"{i:05d}.png"))


def sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def install_weights(pytorch_fid, tmp: str) -> None:
    """Put the npz's weights where pytorch-fid's `load_state_dict_from_url` looks first."""
    state = pytorch_fid_state(pytorch_fid.inception, load_mapping())
    hub = os.path.join(tmp, "torch_home", "hub", "checkpoints")
    os.makedirs(hub)
    torch.save(state, os.path.join(hub, os.path.basename(pytorch_fid.inception.FID_WEIGHTS_URL)))
    os.environ["TORCH_HOME"] = os.path.join(tmp, "torch_home")


def run_fid() -> None:
    pytorch_fid, torchvision = import_pytorch_fid()
    train = read_idx(os.path.join(SHARED, "mnist", "train-images-idx3-ubyte.gz"))[:N_IMAGES]
    test = read_idx(os.path.join(SHARED, "mnist", "t10k-images-idx3-ubyte.gz"))[:N_IMAGES]
    with tempfile.TemporaryDirectory() as tmp:
        install_weights(pytorch_fid, tmp)
        dirs = [os.path.join(tmp, "mnist_train_0_500"), os.path.join(tmp, "mnist_test_0_500")]
        write_pngs(train, dirs[0])
        write_pngs(test, dirs[1])
        argv = ["--device", "cpu", "--batch-size", "50", "--num-workers", "0", *dirs]
        sys.argv = ["pytorch_fid", *argv]
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            pytorch_fid.fid_score.main()
    line = [x for x in printed.getvalue().splitlines() if x.startswith("FID:")][-1]
    print(line)
    record = {
        "fid": float(line.split(":", 1)[1]),
        "printed": line,
        "sets": {
            "a": f"MNIST train-images[:{N_IMAGES}]",
            "b": f"MNIST t10k-images[:{N_IMAGES}]",
            "format": "grayscale PNG per image; pytorch-fid converts to RGB",
        },
        "pytorch_fid_command": "python -m pytorch_fid " + " ".join(argv[:-2] + ["A", "B"]),
        "command": "/tmp/torchvenv/bin/python scripts/fid_reference_pytorch.py fid",
        "date": "2026-11-24",
        "run_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "weights": {
            "npz": "shared/data/inception/" + os.path.basename(NPZ),
            "npz_sha256": sha256(NPZ),
            "fc": "zero-filled (unused for pool features)",
        },
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "torchvision": torchvision.__version__,
            "pytorch_fid": pytorch_fid.__version__,
            "numpy": np.__version__,
            "scipy": scipy.__version__,
            "pillow": PIL.__version__,
        },
        "torch_threads": torch.get_num_threads(),
    }
    with open(os.path.join(OUT, "fid_reference.json"), "w") as f:
        json.dump(record, f, indent=1)
        f.write("\n")


def resize_cases() -> dict[str, np.ndarray]:
    """uint8 NHWC inputs: upsampling (MNIST-, CIFAR-sized, odd aspect) and downsampling."""
    rng = np.random.default_rng(0)
    i, j, c = np.meshgrid(np.arange(331), np.arange(317), np.arange(3), indexing="ij")
    big = ((i * 3 + j * 5 + c * 40 + (i // 16) * (j // 16)) % 256).astype(np.uint8)
    return {
        "gray28": rng.integers(0, 256, (2, 28, 28, 1), dtype=np.uint8),
        "rgb32": rng.integers(0, 256, (2, 32, 32, 3), dtype=np.uint8),
        "rgb13x47": rng.integers(0, 256, (1, 13, 47, 3), dtype=np.uint8),
        "big331x317": big[None],
    }


def torch_preprocess(images: np.ndarray) -> np.ndarray:
    """pytorch-fid's input path on uint8 NHWC: RGB, /255, interpolate, 2x - 1 -> NHWC."""
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float().div(255)
    x = x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x
    x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
    return (2 * x - 1).permute(0, 2, 3, 1).numpy()


def write_fixtures() -> None:
    pytorch_fid, _ = import_pytorch_fid()
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(4, 6, generator=gen)
    sd = {
        "a.weight": torch.randn(3, 2, 2, 2, generator=gen),
        "a.t": base.t(),
        "a.slice": base[1:3, 2:5],
        "a.half": torch.randn(5, generator=gen).half(),
        "a.count": torch.tensor(7),
        "a.mask": torch.tensor([True, False, True]),
    }
    torch.save(sd, os.path.join(OUT, "tiny_zip.pth"))
    torch.save(sd, os.path.join(OUT, "tiny_legacy.pth"), _use_new_zipfile_serialization=False)
    np.savez(os.path.join(OUT, "tiny_pth_expected.npz"), **{k: v.numpy() for k, v in sd.items()})
    shapes = {k: list(v.shape) for k, v in fid_network(pytorch_fid.inception).state_dict().items()}
    with open(os.path.join(OUT, "pytorch_fid_state_shapes.json"), "w") as f:
        f.write("{\n" + ",\n".join(f"{json.dumps(k)}: {v}" for k, v in shapes.items()) + "\n}\n")
    rng = np.random.default_rng(1)
    edge = np.zeros((299, 299), bool)
    edge[[0, -1], :] = edge[:, [0, -1]] = True
    out = {}
    for name, images in resize_cases().items():
        expected = torch_preprocess(images)
        mask = edge | (rng.random((299, 299)) < 0.005)
        out[f"{name}/images"] = images
        out[f"{name}/mask"] = np.packbits(mask)
        out[f"{name}/values"] = expected[:, mask, :]
    np.savez_compressed(os.path.join(OUT, "resize_reference.npz"), **out)
    with tempfile.TemporaryDirectory() as tmp:  # pytorch-fid's activations of 4 MNIST images
        install_weights(pytorch_fid, tmp)
        write_pngs(
            read_idx(os.path.join(SHARED, "mnist", "train-images-idx3-ubyte.gz"))[:4],
            os.path.join(tmp, "pngs"),
        )
        files = sorted(os.path.join(tmp, "pngs", f) for f in os.listdir(os.path.join(tmp, "pngs")))
        model = pytorch_fid.inception.InceptionV3([3])
        feats = pytorch_fid.fid_score.get_activations(files, model, batch_size=4, num_workers=0)
    np.savez_compressed(
        os.path.join(OUT, "mnist_pytorch_fid_features.npz"), train_0_4=feats.astype(np.float32)
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("what", choices=["fid", "fixtures"])
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    run_fid() if args.what == "fid" else write_fixtures()
