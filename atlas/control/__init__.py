"""The control plane: the control protocol between Atlas and game servers, and transfers."""
