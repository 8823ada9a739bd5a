"""The pyfunc as a model from code: ``tracking.log_classifier`` logs this file, and
MLflow runs it to build the model at log and at load time.

MLflow recommends this over logging a PythonModel object, which it would serialize
with CloudPickle: a pickled class ties a registered model to the pickle format and
to the class's code at logging time, and loading it executes whatever the pickle says.
Here the model holds only this file; the class comes from the ``cifar_resnet`` package
that the model carries (``code_paths``). Importing this module only builds an
unloaded CifarClassifier and hands it to ``set_model``.
"""

import mlflow.models

# Absolute import: MLflow executes this file as a stand-alone module, not as part of
# the package.
from cifar_resnet.serving import CifarClassifier

mlflow.models.set_model(CifarClassifier())
