"""`tunesmith predict`: label sentences or a data file with a classifier trained by `tunesmith classify`."""
from tunesmith.classify import predict, predict_cli as cli  # noqa: F401
