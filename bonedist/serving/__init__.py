"""Deployment: an evaluated runs folder exported as a self-contained bundle (``bonedist export``), predicted from with
numpy, OpenCV, onnxruntime and pydicom only (``bonedist.serving.bundle``), and served over HTTP
(``bonedist serve``, ``bonedist.serving.service``).

Everything here but ``export`` is free of torch, timm, kornia and the training stack: the bundle runtime installs from
``deploy/requirements.txt`` alone (``pip install --no-deps bonedist`` on top of it).
"""
