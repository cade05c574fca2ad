"""The files between stages: one typed record + codec per file (trees, labelled steps; `codec` reads them with
errors naming file, line and field) and the readers of the public source datasets."""
