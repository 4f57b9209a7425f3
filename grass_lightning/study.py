"""``python -m grass_lightning.study``: runs `grass_lightning.tools.study`, where the code and its usage are."""

from grass_lightning.tools.study import main

if __name__ == "__main__":
    main()
