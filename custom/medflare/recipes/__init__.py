"""Job recipes: one Python definition per study, from which every shipped job folder is exported."""
