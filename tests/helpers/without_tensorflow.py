"""Run as a script: the demo-data paths with TensorFlow made unimportable.

`python without_tensorflow.py WORKDIR`: a short demo training run, k-NN of its work directory,
attention maps of an official backbone, official checkpoint import, the step benchmark; then
a folder source, which must be refused naming the extra to install. Prints `IMPORTED <stack>`
for every attempt of project code to import TensorFlow, and `DONE` at the end.
"""

import importlib.abc
import os
import pathlib
import sys
import traceback

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parent.parent
attempts: list[str] = []


class WithoutTensorFlow(importlib.abc.MetaPathFinder):
    """One of the interpreter's finders, blind to TensorFlow (as if it were not installed);
    records each time project code asks for it."""

    def __init__(self, finder):
        self.finder = finder

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("tensorflow", "tensorflow_datasets"):
            # the code that asked: the innermost frame outside the import machinery and this file
            asking = next(
                f
                for f in reversed(traceback.extract_stack())
                if not f.filename.startswith("<frozen")
                and f.filename != __file__
                and f"{os.sep}importlib{os.sep}" not in f.filename
            )
            if f"{os.sep}dino_jax{os.sep}" in asking.filename and not checking_sources:
                attempts.append(f"{name} from {asking.filename}:{asking.lineno}")
            return None
        find = getattr(self.finder, "find_spec", None)
        return None if find is None else find(name, path, target)

    def invalidate_caches(self):
        if hasattr(self.finder, "invalidate_caches"):
            self.finder.invalidate_caches()


checking_sources = False
sys.meta_path[:] = [WithoutTensorFlow(f) for f in sys.meta_path]
sys.path[:0] = [str(ROOT)]


def main(workdir: str) -> None:
    global checking_sources
    import numpy as np
    from PIL import Image

    from dino_jax.bench import step as bench_step
    from dino_jax.evaluate.cli import evaluate
    from dino_jax.interop.official import load_backbone, load_official
    from dino_jax.train import main as train

    fixtures = ROOT / "tests" / "fixtures"
    tiny = str(HERE / "fault_config.py")  # the tiny ViT on the bundled demo images
    train(
        [
            f"--config={tiny}",
            f"--workdir={workdir}",
            "--config.optim.epochs=1",
            "--config.optim.batch_size=64",  # 31 steps
            "--config.optim.warmup_epochs=0",
            "--config.data.eval_train_split=test",
            "--config.data.eval_test_split=test",
            "--config.eval.report_baselines=True",
            "--config.eval.attention_images=1",
        ]
    )
    assert (pathlib.Path(workdir) / "attention" / "00" / "overview.png").is_file()
    knn = evaluate(["knn", "--weights", workdir, "--config.eval.knn_max_train=500"])
    assert knn["bank"] == 500 and knn["queries"] == 2000
    assert 0 < knn["metrics"]["knn/top1"] <= 100
    image = pathlib.Path(workdir) / "photo.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 48, 3), np.uint8)).save(image)
    shown = evaluate(
        [
            "attention",
            "--weights",
            str(fixtures / "backbone.pth"),
            "--num_heads",
            "2",
            "--image",
            str(image),
            "--image_size",
            "32",
            "--out",
            str(pathlib.Path(workdir) / "attn"),
        ]
    )
    assert shown["written"]
    model, variables = load_backbone(fixtures / "backbone.pth", num_heads=2)
    assert model.apply(variables, np.zeros((1, 32, 32, 3), np.float32)).cls.shape == (1, 32)
    assert load_official(fixtures / "checkpoint.pth").teacher is not None
    args = [f"--config={tiny}", "--batch", "8", "--steps", "1", "--warmup", "0"]
    (bench,) = bench_step.main(args)
    assert bench["images_per_s_pipelined"] > 0
    print(f"TRAINED_AND_EVALUATED {knn['metrics']['knn/top1']:.2f}", flush=True)

    # Sources that need TensorFlow stop before any work, naming the extra to install.
    checking_sources = True
    folder = pathlib.Path(workdir) / "images"
    folder.mkdir()
    try:
        train(
            [
                "--config=demo",
                f"--workdir={workdir}-folder",
                "--config.data.source=folder",
                f"--config.data.data_dir={folder}",
            ]
        )
    except SystemExit as exit_info:
        print(f"FOLDER_EXIT {exit_info.code}", flush=True)
    assert not os.path.exists(f"{workdir}-folder")
    print("DONE", flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
    for attempt in attempts:
        print(f"IMPORTED {attempt}", flush=True)
    loaded = sorted(
        m for m in sys.modules if m.split(".")[0] in ("tensorflow", "tensorflow_datasets")
    )
    print(f"LOADED {loaded}", flush=True)
