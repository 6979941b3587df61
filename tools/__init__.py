"""Developer tools: fixture builders, the diffusers reference, benchmarks, converters. Importing the package makes
torchvision importable beside the CPU torch first (see torchvision_cpu.py), before any tool imports transformers."""

from tests.support import torchvision_cpu

torchvision_cpu.allow_import()
