// SPDX-License-Identifier: GPL-2.0
/*
 * edu_mdev: QEMU's "edu" PCI device (1234:11e8) as a legacy mdev parent.
 *
 * vfiod hands out mediated devices made on registered PCI functions; QEMU
 * has no PCI device whose driver is an mdev parent, and the kernel's mdev
 * samples hang off virtual devices. This driver binds edu (which Debian has
 * no driver for) and registers it as a parent, so vfiod's mdev claims run
 * against the real mdev core with a PCI parent. It never touches the edu
 * hardware: each mediated device is a VFIO device behind an emulated IOMMU
 * that can be opened (group, container, device fd) but refuses every read,
 * write and ioctl, which is all a test of the hand-out needs.
 *
 * Instances are counted by the mdev core (max_instances, no get_available):
 * one pool per parent, shared by both types, so a create of either type
 * lowers both types' available_instances, and a full parent refuses with
 * EUSERS from the core.
 */
#include <linux/module.h>
#include <linux/pci.h>
#include <linux/slab.h>
#include <linux/mdev.h>
#include <linux/vfio.h>

#define EDU_VENDOR 0x1234
#define EDU_DEVICE 0x11e8

static unsigned int instances = 4;
module_param(instances, uint, 0444);
MODULE_PARM_DESC(instances, "mediated devices per edu parent (all types together)");

/* Per bound edu function: the mdev core keeps pointers into all of it until
 * mdev_unregister_parent() returns. */
struct edu_parent {
	struct mdev_parent parent;
	struct mdev_type types[2];
	struct mdev_type *type_list[2];
};

struct edu_mdev {
	struct vfio_device vdev;
};

static int edu_vfio_open(struct vfio_device *vdev)
{
	return 0;
}

static void edu_vfio_close(struct vfio_device *vdev)
{
}

/* Nothing is emulated: a VMM that tries to use the device learns so at once. */
static ssize_t edu_vfio_read(struct vfio_device *vdev, char __user *buf,
			     size_t count, loff_t *ppos)
{
	return -EINVAL;
}

static ssize_t edu_vfio_write(struct vfio_device *vdev, const char __user *buf,
			      size_t count, loff_t *ppos)
{
	return -EINVAL;
}

static long edu_vfio_ioctl(struct vfio_device *vdev, unsigned int cmd,
			   unsigned long arg)
{
	return -ENOTTY;
}

static const struct vfio_device_ops edu_vfio_ops = {
	.name = "edu-mdev",
	.open_device = edu_vfio_open,
	.close_device = edu_vfio_close,
	.read = edu_vfio_read,
	.write = edu_vfio_write,
	.ioctl = edu_vfio_ioctl,
	/* Required where the kernel has iommufd; NULL where it has not. */
	.bind_iommufd = vfio_iommufd_emulated_bind,
	.unbind_iommufd = vfio_iommufd_emulated_unbind,
	.attach_ioas = vfio_iommufd_emulated_attach_ioas,
	.detach_ioas = vfio_iommufd_emulated_detach_ioas,
};

static int edu_mdev_probe(struct mdev_device *mdev)
{
	struct edu_mdev *em;
	int ret;

	em = vfio_alloc_device(edu_mdev, vdev, &mdev->dev, &edu_vfio_ops);
	if (IS_ERR(em))
		return PTR_ERR(em);
	ret = vfio_register_emulated_iommu_dev(&em->vdev);
	if (ret) {
		vfio_put_device(&em->vdev);
		return ret;
	}
	dev_set_drvdata(&mdev->dev, em);
	return 0;
}

/* Blocks (in vfio_unregister_group_dev) while a process holds the device fd. */
static void edu_mdev_remove(struct mdev_device *mdev)
{
	struct edu_mdev *em = dev_get_drvdata(&mdev->dev);

	vfio_unregister_group_dev(&em->vdev);
	vfio_put_device(&em->vdev);
}

static struct mdev_driver edu_mdev_driver = {
	.device_api = VFIO_DEVICE_API_PCI_STRING,
	.probe = edu_mdev_probe,
	.remove = edu_mdev_remove,
	.driver = {
		.name = "edu_mdev",
		.owner = THIS_MODULE,
		.mod_name = KBUILD_MODNAME,
	},
};

static int edu_pci_probe(struct pci_dev *pdev, const struct pci_device_id *id)
{
	struct edu_parent *ep;
	int ret;

	ep = kzalloc(sizeof(*ep), GFP_KERNEL);
	if (!ep)
		return -ENOMEM;
	/* sysfs shows them as <driver>-<sysfs_name>: edu_mdev-1, edu_mdev-2. */
	ep->types[0].sysfs_name = "1";
	ep->types[0].pretty_name = "edu slice";
	ep->types[1].sysfs_name = "2";
	ep->types[1].pretty_name = "edu slice, second type";
	ep->type_list[0] = &ep->types[0];
	ep->type_list[1] = &ep->types[1];
	ret = mdev_register_parent(&ep->parent, &pdev->dev, &edu_mdev_driver,
				   ep->type_list, ARRAY_SIZE(ep->type_list));
	if (ret) {
		kfree(ep);
		return ret;
	}
	pci_set_drvdata(pdev, ep);
	return 0;
}

/* Removes every mediated device of this parent first (the mdev core does). */
static void edu_pci_remove(struct pci_dev *pdev)
{
	struct edu_parent *ep = pci_get_drvdata(pdev);

	mdev_unregister_parent(&ep->parent);
	kfree(ep);
}

static const struct pci_device_id edu_pci_ids[] = {
	{ PCI_DEVICE(EDU_VENDOR, EDU_DEVICE) },
	{ }
};
MODULE_DEVICE_TABLE(pci, edu_pci_ids);

static struct pci_driver edu_pci_driver = {
	.name = "edu_mdev",
	.id_table = edu_pci_ids,
	.probe = edu_pci_probe,
	.remove = edu_pci_remove,
};

static int __init edu_mdev_init(void)
{
	int ret;

	/* The core copies it into each parent when the parent registers. */
	edu_mdev_driver.max_instances = instances;
	ret = mdev_register_driver(&edu_mdev_driver);
	if (ret)
		return ret;
	ret = pci_register_driver(&edu_pci_driver);
	if (ret)
		mdev_unregister_driver(&edu_mdev_driver);
	return ret;
}

static void __exit edu_mdev_exit(void)
{
	pci_unregister_driver(&edu_pci_driver);
	mdev_unregister_driver(&edu_mdev_driver);
}

module_init(edu_mdev_init);
module_exit(edu_mdev_exit);
MODULE_LICENSE("GPL");
MODULE_DESCRIPTION("QEMU edu PCI device as a legacy mdev parent, for vfiod's VM tests");
