"""Training phases: the teacher (denoising), and later the JDM phases that distil from it."""
