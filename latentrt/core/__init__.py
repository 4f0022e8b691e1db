"""The contracts of latentrt; imports nothing from plugins, exporters or runtimes."""
