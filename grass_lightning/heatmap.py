"""``python -m grass_lightning.heatmap``: runs `grass_lightning.tools.heatmap`, where the code and its usage are."""

from grass_lightning.tools.heatmap import main

if __name__ == "__main__":
    main()
