"""The TRELLIS tab of the 3D View sidebar. Drawing never talks to the daemon: it shows what the
session's timer last learnt."""


import bpy

from . import thumbnails
from .session import SESSION

HAS_PROGRESS = "progress" in bpy.types.UILayout.bl_rna.functions


class TRELLIS_UL_images(bpy.types.UIList):
    bl_idname = "TRELLIS_UL_images"

    def draw_item(self, context, layout, data, item, icon, active_data, active_propname, index):
        row = layout.row(align=True)
        row.prop(item, "filepath", text="", emboss=False)
        row.prop(item, "image", text="")


class VIEW3D_PT_trellis(bpy.types.Panel):
    bl_idname = "VIEW3D_PT_trellis"
    bl_label = "TRELLIS"
    bl_space_type = "VIEW_3D"
    bl_region_type = "UI"
    bl_category = "TRELLIS"

    def draw(self, context):
        layout = self.layout
        s = context.scene.trellis

        row = layout.row(align=True)
        connected = SESSION.client is not None
        row.label(text=SESSION.status_line(), icon="CHECKMARK" if connected else "ERROR")
        row.operator("trellis.connect", text="", icon="FILE_REFRESH")

        layout.row().prop(s, "mode", expand=True)
        col = layout.column()
        if s.mode == "IMAGE":
            col.prop(s, "image_path", text="File")
            col.template_ID(s, "image", open="image.open")
        elif s.mode == "IMAGES":
            row = col.row()
            row.template_list("TRELLIS_UL_images", "", s, "images", s, "images_index", rows=3)
            sub = row.column(align=True)
            sub.operator("trellis.image_add", text="", icon="ADD")
            sub.operator("trellis.image_remove", text="", icon="REMOVE")
            col.prop(s, "multi_image_mode")
        col.prop(s, "prompt", text="" if s.mode == "TEXT" else "Variant prompt")

        box = layout.box()
        box.prop(s, "show_sampling", icon="TRIA_DOWN" if s.show_sampling else "TRIA_RIGHT",
                 emboss=False)
        box.prop(s, "seed")
        if s.show_sampling:
            grid = box.grid_flow(columns=2, align=True)
            grid.prop(s, "ss_steps")
            grid.prop(s, "ss_cfg")
            grid.prop(s, "slat_steps")
            grid.prop(s, "slat_cfg")
        layout.row().prop(s, "outputs", expand=True)

        col = layout.column(align=True)
        col.scale_y = 1.3
        col.operator("trellis.generate", icon="PLAY")
        row = layout.row(align=True)
        row.operator("trellis.variant", icon="DUPLICATE")
        row.prop(s, "keep_original", text="")
        if SESSION.capable("edit"):
            box = layout.box()
            box.row().prop(s, "region_source", expand=True)
            if s.region_source == "BOX":
                box.prop(s, "region_box")
            box.operator("trellis.edit_region", icon="EDITMODE_HLT")

        if SESSION.jobs:
            layout.separator()
            header = layout.row()
            header.label(text="Jobs")
            header.operator("trellis.clear_jobs", text="", icon="TRASH")
            for job in reversed(list(SESSION.jobs.values())):
                jb = layout.box()
                row = jb.row(align=True)
                row.label(text=job.label)
                if job.active:
                    op = row.operator("trellis.cancel", text="", icon="X")
                    op.key = job.key
                if HAS_PROGRESS and job.state in ("running", "queued", "starting"):
                    jb.progress(factor=job.progress, type="BAR", text=job.describe())
                else:
                    jb.label(text=job.describe())
                icon = thumbnails.icon_id(job.preview) if job.state == "done" else 0
                if icon:
                    jb.template_icon(icon_value=icon, scale=6.0)


classes = (TRELLIS_UL_images, VIEW3D_PT_trellis)
