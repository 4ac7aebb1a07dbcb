"""The class lab: the shared board of every student's runs on one MLflow server."""
