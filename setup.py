from setuptools import find_packages, setup

setup(
    name='dlm',
    version='0.1.0',
    description='JAX/Flax framework for masked diffusion language models: RADD pretraining, '
                'fast samplers and BGPO reinforcement learning.',
    python_requires='>=3.10',
    packages=find_packages(include=['dlm', 'dlm.*', 'configs']),
    package_data={'dlm.tasks': ['data/*']},
    install_requires=[
        'jax==0.10.2',
        'jaxlib==0.10.2',
        'flax==0.12.8',
        'optax==0.2.8',
        'orbax-checkpoint==0.12.8',
        'grain==0.2.18',
        'tensorflow-datasets==4.9.10',
        'array-record==0.8.6',
        'ml-collections==1.1.0',
        'sentencepiece==0.2.3',
        'tokenizers==0.23.3',
        'huggingface-hub==2.4.0',  # tokenizers' dependency, pinned too
        'jinja2==3.1.6',
        'etils[epath,epath-gcs]==1.15.0',
        'gcsfs==2026.10.1',  # gs:// workdirs (etils.epath's GCS backend)
        'fsspec==2026.9.0',
        'google-cloud-storage==3.17.1',
        'absl-py==2.5.1',
        'numpy==2.4.6',
        'matplotlib==3.11.2',
        'tensorboardX==2.6.5',
        'safetensors==0.8.0',
    ],
    extras_require={
        # libtpu: TPU ahead-of-time compilation (the dry run, dlm.dry_run) on any machine, and
        # the TPU runtime on a TPU VM; the version jax[tpu]==0.10.2 pins (libtpu==0.0.42.*).
        'tpu': ['libtpu==0.0.42.1'],
        # The tests compile tiny steps for TPU slices too (tests/test_dry_run.py): libtpu is a
        # 213 MB wheel (684 MB installed), ~6 s to install from a local mirror.
        # gcp-storage-emulator: gs:// workdirs tested on loopback; nbclient & co.: the notebook.
        'test': ['pytest==9.0.3', 'pytest-xdist==3.8.0', 'execnet==2.1.2', 'libtpu==0.0.42.1',
                 'gcp-storage-emulator==2026.7.19', 'nbclient==0.11.0', 'nbformat==5.11.1',
                 'ipykernel==7.4.0', 'traitlets==5.15.0', 'jupyter-client==8.10.0',
                 'jupyter-core==5.9.1', 'pyzmq==27.3.0', 'tornado==6.6.1'],
    },
)
