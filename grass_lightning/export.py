"""``python -m grass_lightning.export``: runs `grass_lightning.app.export`, where the code and its usage are."""

from grass_lightning.app.export import main

if __name__ == "__main__":
    main()
