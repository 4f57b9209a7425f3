"""``python -m grass_lightning.bench``: runs `grass_lightning.tools.bench`, where the code and its usage are."""

from grass_lightning.tools.bench import main

if __name__ == "__main__":
    main()
