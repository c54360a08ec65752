"""The study's label set: the five harmonised findings every model predicts, in the order of its outputs.

It lives with the models (the served bento needs it, the training pipeline does not own it); the data layer
maps every data set's findings onto it.
"""

LABELS: tuple[str, ...] = ("atelectasis", "cardiomegaly", "pleural_effusion", "pneumonia", "no_finding")
