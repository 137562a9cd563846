"""PEFT methods: LoRA family, IA3, prompt tuning, bottleneck adapters, SVFit."""
