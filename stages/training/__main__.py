"""``python -m stages.training``: :func:`stages.training.launch.main`."""

from stages.training.launch import main

if __name__ == "__main__":
    main()
