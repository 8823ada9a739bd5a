"""The MLflow pyfunc that serves a trained classifier.

It imports neither the engine, Optuna nor Hydra: a logged model carries this
package (``code_paths``) and a small weights file, and needs only torch at load.
"""

from __future__ import annotations

from pathlib import Path

import mlflow.pyfunc
import numpy as np
import torch

from .models import ImageClassifier, build_model

WEIGHTS_ARTIFACT = "weights"


def save_weights(path: Path, model: ImageClassifier, model_name: str, model_kwargs: dict,
                 class_names: list[str]) -> Path:
    """What the pyfunc needs to rebuild the network: no optimizer, no RNG state."""
    torch.save({"model_name": model_name, "model_kwargs": dict(model_kwargs),
                "class_names": list(class_names),
                "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()}}, path)
    return path


def load_classifier(path: str | Path) -> tuple[ImageClassifier, list[str]]:
    saved = torch.load(path, map_location="cpu", weights_only=True)
    net = build_model(saved["model_name"], num_classes=len(saved["class_names"]),
                      **saved["model_kwargs"])
    model = ImageClassifier(net, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    model.load_state_dict(saved["state_dict"])
    return model.eval(), saved["class_names"]


class CifarClassifier(mlflow.pyfunc.PythonModel):
    """uint8 images (N, 32, 32, 3) in, the 10 class probabilities (N, 10) out."""

    def load_context(self, context) -> None:
        self.model, self.class_names = load_classifier(context.artifacts[WEIGHTS_ARTIFACT])
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model.to(self.device)

    @torch.inference_mode()
    def predict(self, context, model_input, params=None) -> np.ndarray:
        images = np.asarray(model_input)
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != (32, 32, 3):
            raise ValueError(f"expected uint8 images of shape (N, 32, 32, 3), got "
                             f"{images.dtype} {images.shape}")
        x = torch.from_numpy(images).permute(0, 3, 1, 2).to(self.device)
        return self.model(x).float().softmax(1).cpu().numpy()
