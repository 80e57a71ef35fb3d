"""The code MLflow runs to load a registered show1 stage ("models from code": no pickle inside the model)."""

import mlflow.models

from show1.registry.stage_model import Show1StageModel

mlflow.models.set_model(Show1StageModel())
