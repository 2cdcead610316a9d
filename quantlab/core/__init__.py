"""What every stage uses and nothing in quantlab is below: user errors vs bugs (``errors``), atomic writes of
artifacts (``files``), the one registry idiom (``registry``), compute devices (``device``), progress bars
(``progress``)."""
