"""``python -m grass_lightning.gather``: runs `grass_lightning.tools.gather`, where the code and its usage are."""

from grass_lightning.tools.gather import main

if __name__ == "__main__":
    main()
